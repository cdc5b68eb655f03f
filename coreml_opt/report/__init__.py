"""Human-readable output: terminal tables, Markdown, HTML and plots."""
