"""The HTTP routes, one router a file: `/generate`, the OpenAI API, token utilities, operations
(`/health`, `/ready`, `/metrics`, `/pool`, the dashboard) and the offline API docs."""
