"""Everything that speaks Label Studio: label configs, interactive contexts, result dicts, brush RLE,
task images, the REST client with its token, and a local Label Studio process."""
