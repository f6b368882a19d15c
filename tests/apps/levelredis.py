"""A handler that uses qstack.LevelPool with redis-py: replies with the
request's level and the Redis CLIENT ID of the connection it used.

$QSTACK_TEST_REDIS names the redis-server's unix socket.  redis-py is made
cooperative on the first request (in the core process, not the supervisor).
"""

import os

import qstack

_pool = None


def _client():
    import redis
    return redis.Redis(unix_socket_path=os.environ["QSTACK_TEST_REDIS"],
                       single_connection_client=True, socket_timeout=10)


def handle(req):
    global _pool
    if _pool is None:
        from gevent import monkey
        monkey.patch_socket()
        _pool = qstack.LevelPool(_client)
    with _pool.connection() as r:
        cid = r.client_id()
    return b"%s %d\n" % (str(qstack.current_level()).encode(), cid)
