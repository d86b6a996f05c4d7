"""
The users and aliases files, passwords, and the users file's durable rewrite.
"""
