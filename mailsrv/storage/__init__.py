"""
Everything durable: Maildir delivery, the queue and its envelopes, spool files, and the
write-fsync-rename helper they share.
"""
