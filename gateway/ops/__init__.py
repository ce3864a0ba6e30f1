"""The ops CLI (``fleetgate nodes|keys``): registry and client keys straight through the store,
node checks over HTTP. It never imports the replica's request path."""
