"""
rspamd as the content filter (issue 14 item 4): its HTTP protocol (``protocol``), the client
that asks it from a delivery thread (``client``), the in-place removal of the fields it asks to
remove (``removal``) and the checks that act on its verdict (``checks``).
"""
