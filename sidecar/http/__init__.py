"""The HTTP surfaces: the data port (proxy, admission API, gateway check) and the admin port."""
