"""http_server:distro:sys: the node's web server, login, and Kinode's HTTP API for processes."""
