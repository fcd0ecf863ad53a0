"""Control plane: the UNIX-socket server in the daemon and the narctl client."""
