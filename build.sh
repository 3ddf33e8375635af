#!/usr/bin/env bash
# Set up and build everything: the virtualenv with the pinned packages (pyproject.toml), every
# process of every package in components/ compiled to a Wasm component with componentize-py (a
# JavaScript one, `main.js`, with componentize-js, pinned in package-lock.json), and
# those components compiled ahead of time into wasmtime's cache so a node starts warm.
# Re-running it rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
deps_stamp=$VENV/.deps-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$deps_stamp" ]; then
    echo "== installing pinned packages (pyproject.toml)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test]"
    rm -f "$VENV"/.deps-*
    touch "$deps_stamp"
fi

# process_lib is staged alone so componentize-py bundles only it, not the rest of components/,
# with the host's kinode_types (ids and naming rules) beside it, importable as host.kinode_types in
# guests as in the host
STAGE=$ROOT/build/pylib
rm -rf "$STAGE" && mkdir -p "$STAGE/process_lib" "$STAGE/host"
cp components/process_lib/*.py "$STAGE/process_lib/"
cp host/kinode_types.py "$STAGE/host/"
echo '"""The host modules that guests share: kinode_types only."""' > "$STAGE/host/__init__.py"

build_one() {  # package_dir process_dir [output_package_dir]
    local pkg=$1 dir=$2 dest=${3:-$1} name world out inputs
    name=$(basename "$dir")
    world=$(sed -n 's/^# world: *//p' "$dir/main.py" | head -n1)
    if [ -z "$world" ]; then echo "error: $dir/main.py has no '# world: NAME' line" >&2; return 1; fi
    # a portable build uses each world's twin without the host extension (wit/host-ext.wit)
    [ "$dest" != "$pkg" ] && world=$(echo "$world" | sed -E 's/-ext@/-portable@/; s/courier-process@/courier-process-portable@/')
    out=$dest/pkg/$name.wasm
    inputs=$(cat wit/*.wit components/process_lib/*.py host/kinode_types.py "$dir"/*.py $( [ -d "$pkg/common" ] && echo "$pkg"/common/*.py ) \
             | sha256sum | cut -c1-32)-$world
    if [ -f "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$inputs" ]; then
        echo "   $out is up to date"
        return 0
    fi
    echo "   building $out (world $world)"
    local extra=()
    [ -d "$pkg/common" ] && extra=(-p "$pkg/common")
    "$VENV/bin/componentize-py" -d wit -w "$world" componentize main -p "$dir" "${extra[@]}" -p "$STAGE" \
        -o "$out.tmp" > "$ROOT/build/$name.log" 2>&1 || { cat "$ROOT/build/$name.log" >&2; return 1; }
    mv "$out.tmp" "$out"
    echo "$inputs" > "$out.inputs"
}

# JavaScript processes (`*/main.js`) are built with componentize-js, pinned in package.json and
# package-lock.json and installed by `npm ci` into node_modules/ whenever the lock file changes
JS_TOOL=$ROOT/node_modules/.bin/componentize-js
JS_FLAGS=(--disable http fetch-event)  # no wasi:http: a process reaches the world through the kernel
js_tools() {
    if ! command -v npm >/dev/null; then
        echo "warning: npm is not installed: JavaScript processes are not built (their tests are skipped)" >&2
        return 1
    fi
    local stamp=$ROOT/node_modules/.lock-$(sha256sum package-lock.json | cut -c1-16)
    if [ ! -f "$stamp" ] || [ ! -x "$JS_TOOL" ]; then
        echo "== installing pinned JavaScript build tools (package-lock.json)"
        # (called as an `if` condition, where set -e does not apply: check by hand)
        npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null \
            || { echo "error: npm ci failed (is the npm registry reachable?)" >&2; exit 1; }
        touch "$stamp"
    fi
}

build_js() {  # package_dir process_dir: DIR/main.js -> PACKAGE/pkg/NAME.wasm
    local pkg=$1 dir=$2 name world out inputs
    name=$(basename "$dir")
    world=$(sed -n 's|^// world: *||p' "$dir/main.js" | head -n1)
    if [ -z "$world" ]; then echo "error: $dir/main.js has no '// world: NAME' line" >&2; return 1; fi
    out=$pkg/pkg/$name.wasm
    inputs=$( (cat wit/*.wit package-lock.json "$dir"/*.js; echo "${JS_FLAGS[*]}") | sha256sum | cut -c1-32)-$world
    if [ -f "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$inputs" ]; then
        echo "   $out is up to date"
        return 0
    fi
    echo "   building $out (JavaScript, world $world)"
    "$JS_TOOL" "$dir/main.js" --wit wit --world-name "$world" "${JS_FLAGS[@]}" \
        --out "$out.tmp" > "$ROOT/build/$(basename "$pkg")-$name-js.log" 2>&1 || { cat "$ROOT/build/$(basename "$pkg")-$name-js.log" >&2; return 1; }
    mv "$out.tmp" "$out"
    echo "$inputs" > "$out.inputs"
}

if [ "${PORTABLE:-}" = 1 ]; then
    # Every package (or those named in PORTABLE_PACKAGES; of their processes, those named in
    # PORTABLE_PROCESSES) built against Kinode's worlds only, into
    # build/portable/<package>/: installable with --packages build/portable, runnable on any host.
    echo "== building portable components into build/portable/"
    pids=()
    for pkg in components/*/; do
        pkg=${pkg%/}
        [ -f "$pkg/metadata.json" ] || continue
        [ -z "${PORTABLE_PACKAGES:-}" ] || [[ " $PORTABLE_PACKAGES " == *" $(basename "$pkg") "* ]] || continue
        dest=build/portable/$(basename "$pkg")
        mkdir -p "$dest/pkg"
        cp "$pkg/metadata.json" "$dest/"
        cp "$pkg"/pkg/*.json "$dest/pkg/"
        for dir in "$pkg"/pkg/*/; do [ -d "$dir" ] && cp -r "${dir%/}" "$dest/pkg/"; done  # e.g. its web UI
        for main in "$pkg"/*/main.py; do
            [ -z "${PORTABLE_PROCESSES:-}" ] || [[ " $PORTABLE_PROCESSES " == *" $(basename "$(dirname "$main")") "* ]] || continue
            build_one "$pkg" "$(dirname "$main")" "$dest" &
            pids+=($!)
            if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
        done
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for links in components/*/links.txt; do
        dest=build/portable/$(basename "$(dirname "$links")")
        [ -d "$dest" ] || continue
        grep -v '^\s*\(#\|$\)' "$links" | while read -r rel; do
            src=build/portable/$rel
            [ -f "$src" ] || { echo "error: $links names $rel, which was not built portable" >&2; exit 1; }
            cmp -s "$src" "$dest/pkg/$(basename "$rel")" 2>/dev/null || cp "$src" "$dest/pkg/"
        done
    done
    "$VENV/bin/python" -m host.runtime.wasm build/portable/*/pkg/*.wasm
    echo "== done: portable packages in build/portable/ (run them with --packages build/portable)"
    exit 0
fi

echo "== building components"
pids=()
js_mains=()
for pkg in components/*/ tests/packages/*/ tests/liar/*/ tests/conformance/packages/*/ tests/conformance/guests/*/; do
    pkg=${pkg%/}
    [ -f "$pkg/metadata.json" ] || continue
    for main in "$pkg"/*/main.js; do if [ -f "$main" ]; then js_mains+=("$main"); fi; done
    for main in "$pkg"/*/main.py; do
        [ -f "$main" ] || continue
        build_one "$pkg" "$(dirname "$main")" &
        pids+=($!)
        # two at a time: componentize-py is CPU-bound and this machine has two cores
        if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
done
for p in "${pids[@]}"; do wait "$p"; done

if [ ${#js_mains[@]} -gt 0 ] && js_tools; then
    for main in "${js_mains[@]}"; do
        build_js "$(dirname "$(dirname "$main")")" "$(dirname "$main")"
    done
fi

# a package's links.txt names wasm files of other packages to bundle into its pkg/ (kit's -a)
for links in components/*/links.txt; do
    [ -f "$links" ] || continue
    pkg=$(dirname "$links")
    grep -v '^\s*\(#\|$\)' "$links" | while read -r rel; do
        src=components/$rel
        [ -f "$src" ] || { echo "error: $links names $rel, which was not built" >&2; exit 1; }
        dest=$pkg/pkg/$(basename "$rel")
        cmp -s "$src" "$dest" 2>/dev/null || { cp "$src" "$dest"; echo "   linked $src into $pkg/pkg/"; }
    done
done

echo "== compiling components into the wasmtime cache"
"$VENV/bin/python" -m host.runtime.wasm components/*/pkg/*.wasm tests/packages/*/pkg/*.wasm tests/liar/*/pkg/*.wasm \
    tests/conformance/packages/*/pkg/*.wasm $(ls tests/conformance/guests/*/pkg/*.wasm 2>/dev/null)
echo "== done. Run a node: .venv/bin/python -m host --node fake.dev"
