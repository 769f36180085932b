"""Load testing: synthetic clients that replay call scripts over the wire protocol with pre-encoded media."""
