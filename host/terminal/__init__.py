"""The terminal: output lines, commands, the control socket, terminal:distro:sys."""
