"""Dashboard-only writes: accounts, organisations, members and invitations, the audit log,
content logging. API keys, tenants and usage go through ``tenants.services``; the functions
here wrap them where the dashboard also records an audit entry."""
