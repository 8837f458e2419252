"""The instruments experiments measure with: raw wire capture, fault-injecting wrappers, conformance vectors."""
