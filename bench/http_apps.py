"""The apps bench/http.py serves on every server (WSGI, and Flask)."""


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
    return [b"Hello, World!"]


def _flask():
    from flask import Flask
    app = Flask(__name__)

    @app.get("/")
    def index():
        return "Hello, World!"

    return app


flask_app = _flask()
