"""A txcallme client written with pika from README's "Wire protocol" section
alone (no txcallme imports). Run: pika_client.py AMQP_URL SERVER_ID

Prints one JSON object per line for each case: what was sent and every
reply that arrived for it (body and properties), so a test can check them.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import pika

CASES = [
    # (case, method, body fields or raw bytes, extra properties)
    ("positional", {"method": "add", "args": [1, 2]}, {}),
    ("keywords", {"method": "add", "kwargs": {"a": 1, "b": 2}}, {}),
    ("mixed", {"method": "add", "args": [1], "kwargs": {"b": 5}}, {}),
    ("no-args", {"method": "answer"}, {}),
    ("error", {"method": "div", "args": [1, 0]}, {}),
    ("unknown-method", {"method": "no_such_function", "args": []}, {}),
    ("bad-arguments", {"method": "add", "args": [1]}, {}),
    ("not-json", b"this is not JSON", {}),
    ("unknown-field", {"method": "add", "args": [1, 2], "colour": "red"}, {}),
    ("wrong-content-type", {"method": "add", "args": [1, 2]},
     {"content_type": "text/plain"}),
    # past its deadline and without an expiration (which would win: see README)
    ("late", {"method": "add", "args": [1, 2], "deadline": time.time() - 60},
     {"expiration": None}),
    ("ping", {"method": "__callme__.ping"}, {}),
    ("describe", {"method": "__callme__.describe"}, {}),
]


def main(url: str, server_id: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    uid = uuid.uuid4().hex
    exchange, queue = f"client_guest_ex_{uid}", f"client_guest_queue_{uid}"
    channel.exchange_declare(exchange, "direct", durable=False, auto_delete=True)
    channel.queue_declare(queue, exclusive=True, auto_delete=True)
    channel.queue_bind(queue, exchange, routing_key=exchange)
    replies: dict[str, list[dict]] = {}

    def on_reply(ch, method, props, body):
        replies.setdefault(props.correlation_id, []).append({
            "body": json.loads(body),
            "properties": {"correlation_id": props.correlation_id,
                           "content_type": props.content_type},
            "exchange": method.exchange, "routing_key": method.routing_key})

    channel.basic_consume(queue, on_reply, auto_ack=True)
    channel.confirm_delivery()
    sent = []

    def publish(case, body, extra, expiration="5000"):
        corr = f"{case}-{uuid.uuid4().hex[:8]}"
        props = {"correlation_id": corr, "reply_to": exchange,
                 "content_type": "application/json", "expiration": expiration, **extra}
        props = {k: v for k, v in props.items() if v is not None}
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        channel.basic_publish(server_exchange, server_id, raw,
                              pika.BasicProperties(**props), mandatory=True)
        sent.append({"case": case, "correlation_id": corr, "properties": props,
                     "body": body if isinstance(body, dict) else raw.decode()})
        return corr

    server_exchange = f"server_{server_id}_ex"
    for case, body, extra in CASES:
        publish(case, body, extra)
    # expiration: while `slow` holds the server's only prefetch slot, a request
    # with a 200 ms expiration waits at the head of the queue and expires there
    publish("slow", {"method": "slow", "args": [1.5]}, {})
    publish("expired", {"method": "add", "args": [1, 2]}, {}, expiration="200")
    # no reply_to: not run, nothing comes back; the server keeps serving
    channel.basic_publish(server_exchange, server_id,
                          json.dumps({"method": "add", "args": [1, 2]}).encode(),
                          pika.BasicProperties(correlation_id="no-reply-to",
                                               content_type="application/json"),
                          mandatory=True)
    publish("after-all", {"method": "add", "args": [40, 2]}, {})
    deadline = time.time() + 6
    while time.time() < deadline:
        connection.process_data_events(time_limit=0.2)
        if len(replies) >= len(sent) - 2 and "after-all" in str(replies):
            connection.process_data_events(time_limit=1.0)  # anything late
            break
    for item in sent:
        print(json.dumps({**item, "replies": replies.get(item["correlation_id"], [])}))
    connection.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
