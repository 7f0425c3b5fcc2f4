"""Reports rendered from records and manifests: markdown sections, tables and figures."""
