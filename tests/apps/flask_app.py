"""A Flask app the HTTP tests serve unchanged (tests/test_http.py)."""

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.get("/hello/<name>")
def hello(name):
    return f"{request.args.get('greeting', 'Hello')}, {name}!"


@app.post("/json")
def echo_json():
    return jsonify(got=request.get_json(), priority=request.environ["qstack.priority"])


@app.get("/stream")
def stream():
    return Response(b"line %d\n" % i for i in range(1000))
