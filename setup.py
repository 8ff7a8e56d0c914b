from setuptools import setup

setup(
    name="vncgate",
    version="0.1.0",
    description="A VNC console gateway: short-lived console URLs relayed to VM consoles",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["vncgate", "vncgate.console", "vncgate.control", "vncgate.front", "vncgate.net",
              "vncgate.store"],
    package_data={"vncgate.control": ["openapi.json", "admin/*.html", "admin/*.js", "admin/*.css"],
                  "vncgate.front": ["static/*.html", "static/*.js", "static/*.css", "static/xterm/*"]},
    python_requires=">=3.9",
    install_requires=[],  # the standard library only; Redis is the [redis] extra
    extras_require={"redis": ["redis>=4.2"],
                    "test": ["redis>=4.2", "pytest", "hypothesis", "vncdotool", "playwright", "websockets", "cryptography", "websockify",
                             "prometheus_client", "jsonschema", "openapi-schema-validator",
                             "openapi-spec-validator", "wsproto", "coverage"]},
    entry_points={"console_scripts": [
        "vncgate = vncgate.control.cli_serve:serve_main_exit",
        "vncgate-token = vncgate.control.cli:token_main_exit",
        "vncgate-connect = vncgate.control.connect:main_exit",
    ]},
)
