"""
The checks pipeline: the rules deciding whether mail is taken, stage by stage, and the
modifiers that may rewrite a message before it is stored.
"""
