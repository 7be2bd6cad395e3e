"""Pure HL7 v2 text handling: header fast path, charsets, ACKs, batches."""
