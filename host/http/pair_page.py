"""The web page "pair with a node" (/pair): the nodes seen nearby, a button that shows a pairing
code, and a form to type one; the terminal's `nearby`, `pair` and `pair CODE [NODE|HOST:PORT]`.
The login cookie is SameSite=Strict, so another site cannot post these forms for the user."""
from __future__ import annotations

import asyncio
import html

from aiohttp import web


def _esc(value: object) -> str:
    return html.escape(str(value))


async def handle(request: web.Request, node, page) -> web.StreamResponse:
    """GET shows the page; POST action=code shows a new code, action=join pairs with a code."""
    note = ""
    if request.method == "POST":
        form = await request.post()
        action = form.get("action")
        try:
            if action == "code":
                code, how = node.pair_code()
                note = (f"<p class=code>pairing code: <b>{_esc(code)}</b></p><p>On the other node type "
                        f"<code>{_esc(how)}</code>, or enter it on its pair page. It works once, "
                        f"for 10 minutes.</p>")
            elif action == "join":
                code, target = str(form.get("code", "")), str(form.get("target", "")).strip() or None
                shown = await asyncio.to_thread(node.pair_join_wait, code, target)
                note = "".join(f"<p class=ok>{_esc(line)}</p>" for line in shown.splitlines())
            else:
                return web.json_response({"error": "action must be code or join"}, status=400)
        except ValueError as e:
            note = f"<p class=err>pairing failed: {_esc(e)}</p>"
    elif request.method not in ("GET", "HEAD"):
        return web.json_response({"error": "GET or POST only"}, status=405)
    try:
        nearby = node.nearby_text()
    except ValueError as e:
        nearby = str(e)
    body = f"""<h1>{_esc(node.node_name)}: pair with a node</h1>{note}
<h2>Show a code</h2><p>The other node types it to pair with this one.</p>
<form method=post><input type=hidden name=action value=code><button>Show a pairing code</button></form>
<h2>Enter a code</h2><p>The code the other node shows; its address only if it is not nearby.</p>
<form method=post><input type=hidden name=action value=join>
<input name=code placeholder=7-guitar-ocean autocomplete=off required>
<input name=target placeholder="NODE, HOST:PORT or NODE via ROUTER (optional)"> <button>Pair</button></form>
<h2>Nearby</h2><pre>{_esc(nearby)}</pre><p><a href=/>back</a></p>"""
    return web.Response(text=page(f"{node.node_name}: pair", body), content_type="text/html")
