"""The health-checker process (``fleetgate health-checker``): probe rounds, leadership with a
fencing token, probes of the nodes. It never imports the replica's request path."""
