"""TLS-RPT (RFC 8460): what our outbound TLS sessions did, counted per policy domain
(counts), classified (results), reported once a day to each domain's rua (document, reporter,
https)."""
