"""`glm clean`: normalizers, boilerplate removal, quality filters and PII redaction, composed as one list of steps."""
