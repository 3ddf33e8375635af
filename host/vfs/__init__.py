"""vfs:distro:sys: drives on disk (store, tree) and the service that answers VFS requests."""
