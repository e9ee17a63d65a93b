"""Dashboard-only writes: accounts, organisations, members and invitations. API keys,
tenants, usage, the audit log and content logging go through ``tenants.services``; the
functions here wrap them where the dashboard also records an audit entry."""
