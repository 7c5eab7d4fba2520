"""The NOC's dashboard: Starlette, server-rendered Jinja2 templates, inline SVG charts."""
