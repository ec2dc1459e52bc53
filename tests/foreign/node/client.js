// A txcallme client written with amqplib from README's "Wire protocol"
// section alone. Run: node client.js AMQP_URL SERVER_ID
// Prints one JSON object per line for each case: what was sent and every
// reply that arrived for it, so a test can check them (the same cases as
// ../pika_client.py).
'use strict';

const amqp = require('amqplib');
const crypto = require('crypto');

const now = () => Date.now() / 1000;

const CASES = [
  ['positional', { method: 'add', args: [1, 2] }, {}],
  ['keywords', { method: 'add', kwargs: { a: 1, b: 2 } }, {}],
  ['mixed', { method: 'add', args: [1], kwargs: { b: 5 } }, {}],
  ['no-args', { method: 'answer' }, {}],
  ['error', { method: 'div', args: [1, 0] }, {}],
  ['unknown-method', { method: 'no_such_function', args: [] }, {}],
  ['bad-arguments', { method: 'add', args: [1] }, {}],
  ['not-json', Buffer.from('this is not JSON'), {}],
  ['unknown-field', { method: 'add', args: [1, 2], colour: 'red' }, {}],
  ['wrong-content-type', { method: 'add', args: [1, 2] }, { contentType: 'text/plain' }],
  // past its deadline and without an expiration (which would win: see README)
  ['late', { method: 'add', args: [1, 2], deadline: now() - 60 }, { expiration: undefined }],
  ['ping', { method: '__callme__.ping' }, {}],
  ['describe', { method: '__callme__.describe' }, {}],
];

async function main(url, serverId) {
  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  const uid = crypto.randomBytes(16).toString('hex');
  const exchange = `client_guest_ex_${uid}`;
  const queue = `client_guest_queue_${uid}`;
  await channel.assertExchange(exchange, 'direct', { durable: false, autoDelete: true });
  await channel.assertQueue(queue, { exclusive: true, autoDelete: true, durable: false });
  await channel.bindQueue(queue, exchange, exchange);
  const replies = {};
  await channel.consume(queue, (msg) => {
    const corr = msg.properties.correlationId;
    (replies[corr] = replies[corr] || []).push({
      body: JSON.parse(msg.content.toString('utf8')),
      properties: { correlation_id: corr, content_type: msg.properties.contentType },
      exchange: msg.fields.exchange,
      routing_key: msg.fields.routingKey,
    });
  }, { noAck: true });
  const serverExchange = `server_${serverId}_ex`;
  const sent = [];
  const publish = (name, body, extra, expiration = '5000') => {
    const corr = `${name}-${crypto.randomBytes(4).toString('hex')}`;
    const props = {
      correlationId: corr, replyTo: exchange, contentType: 'application/json',
      expiration, mandatory: true, ...extra,
    };
    if (props.expiration === undefined) delete props.expiration;
    const raw = Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body));
    channel.publish(serverExchange, serverId, raw, props);
    sent.push({
      case: name, correlation_id: corr,
      properties: {
        correlation_id: corr, reply_to: exchange, content_type: props.contentType,
        expiration: props.expiration,
      },
      body: Buffer.isBuffer(body) ? body.toString('utf8') : body,
    });
  };
  for (const [name, body, extra] of CASES) publish(name, body, extra);
  // expiration: while `slow` holds the server's only prefetch slot, a request
  // with a 200 ms expiration waits at the head of the queue and expires there
  publish('slow', { method: 'slow', args: [1.5] }, {});
  publish('expired', { method: 'add', args: [1, 2] }, {}, '200');
  // no reply_to: not run, nothing comes back; the server keeps serving
  channel.publish(serverExchange, serverId,
    Buffer.from(JSON.stringify({ method: 'add', args: [1, 2] })),
    { correlationId: 'no-reply-to', contentType: 'application/json', mandatory: true });
  publish('after-all', { method: 'add', args: [40, 2] }, {});
  await channel.waitForConfirms();
  const until = Date.now() + 6000;
  const afterAll = sent[sent.length - 1].correlation_id;
  while (Date.now() < until && !replies[afterAll]) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await new Promise((resolve) => setTimeout(resolve, 1000)); // anything late
  for (const item of sent) {
    console.log(JSON.stringify({ ...item, replies: replies[item.correlation_id] || [] }));
  }
  await channel.close();
  await connection.close();
}

main(process.argv[2], process.argv[3]).catch((err) => {
  console.error(err);
  process.exit(1);
});
