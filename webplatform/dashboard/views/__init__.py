"""Dashboard views: parse and validate, call one service or selector, render a template."""
