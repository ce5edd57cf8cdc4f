"""Export and serving: HF directories, serving bundles, the HTTP server."""
