from setuptools import setup

setup(
    name="vncgate",
    version="0.1.0",
    description="A VNC console gateway: short-lived console URLs relayed to VM consoles",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["vncgate", "vncgate.store"],
    package_data={"vncgate": ["openapi.json", "admin/*.html", "admin/*.js", "admin/*.css", "static/*.html",
                             "static/*.js", "static/*.css", "static/xterm/*"]},
    python_requires=">=3.9",
    install_requires=["redis>=4.2"],
    extras_require={"test": ["pytest", "hypothesis", "vncdotool", "playwright", "websockets", "cryptography", "websockify",
                             "prometheus_client", "jsonschema", "openapi-schema-validator",
                             "openapi-spec-validator"]},
    entry_points={"console_scripts": [
        "vncgate = vncgate.cli:serve_main_exit",
        "vncgate-token = vncgate.cli:token_main_exit",
        "vncgate-connect = vncgate.connect:main_exit",
    ]},
)
