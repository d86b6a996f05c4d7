"""
A message's header section: read as mail readers do, and the trace fields we prepend.
"""
