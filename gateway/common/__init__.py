"""What more than one process uses: configuration parsing (flags, ``FLEETGATE_*``, a file),
logging, the metric types, and the clean-up of DistServe state. It imports only shared_state."""
