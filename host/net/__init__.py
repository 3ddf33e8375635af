"""net:distro:sys: the directory of nodes, the Noise transport between nodes, routers."""
