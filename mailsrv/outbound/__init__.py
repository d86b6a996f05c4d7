"""
Mail going out: the relayer (scheduler, outcome, control channel, destinations), MX
resolution, the SMTP client, and the bounces and delay warnings (RFC 3464).
"""
