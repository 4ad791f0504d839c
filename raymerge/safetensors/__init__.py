"""The safetensors file format and the Hugging Face index file: parse, validate, serialize."""
