// A txcallme server written with amqplib from README's "Wire protocol"
// section and docs/wire.rst alone. Run: node server.js AMQP_URL SERVER_ID
// Declares the server's exchange and queue with txcallme's flags, serves
// add, div, echo_properties and slow, answers errors with error envelopes,
// prints "ready" once it consumes, and stops on SIGTERM.
'use strict';

const amqp = require('amqplib');

class ZeroDivisionError extends Error {}

// each function with its parameter names, for keyword arguments
const FUNCTIONS = {
  add: [['a', 'b'], (a, b) => a + b],
  div: [['a', 'b'], (a, b) => {
    if (b === 0) throw new ZeroDivisionError('division by zero');
    return a / b;
  }],
  slow: [['seconds'], (seconds) => new Promise((resolve) => {
    setTimeout(() => resolve(null), seconds * 1000);
  })],
};

// reply_to of a caller using RabbitMQ's Direct Reply-to (the broker hands the
// server amq.rabbitmq.reply-to.<token>)
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';

// [exchange, routing key] of a reply: the caller's exchange with its name as
// key, or for Direct Reply-to the default exchange with reply_to as key
const replyDestination = (replyTo) => (
  replyTo.startsWith(DIRECT_REPLY_TO) ? ['', replyTo] : [replyTo, replyTo]);

const error = (type, message, args, traceback = '') => (
  { error: { type, message, args: args || [message], traceback } });

async function handle(msg) {
  const props = msg.properties;
  if (props.contentType !== undefined && props.contentType !== 'application/json') {
    return error('txcallme.errors.InvalidRequest', `content type ${props.contentType} not accepted`);
  }
  let request;
  try {
    request = JSON.parse(msg.content.toString('utf8'));
  } catch (e) {
    return error('txcallme.errors.InvalidRequest', `invalid JSON: ${e.message}`);
  }
  const allowed = new Set(['method', 'args', 'kwargs', 'deadline']);
  if (request === null || typeof request !== 'object' || typeof request.method !== 'string'
      || Object.keys(request).some((k) => !allowed.has(k))) {
    return error('txcallme.errors.InvalidRequest', 'wrong request shape');
  }
  const deadline = request.deadline;
  if (deadline !== undefined && deadline !== null && Date.now() / 1000 > deadline) {
    return null; // the caller has given up: not run, no reply
  }
  const args = request.args || [];
  const kwargs = request.kwargs || {};
  if (request.method === 'echo_properties') {
    return {
      result: {
        content_type: props.contentType, expiration: props.expiration,
        correlation_id: props.correlationId, reply_to: props.replyTo, args, kwargs,
        deadline: deadline === undefined ? null : deadline,
      },
    };
  }
  if (!Object.prototype.hasOwnProperty.call(FUNCTIONS, request.method)) {
    return error('txcallme.errors.UnknownMethod', `no function '${request.method}'`);
  }
  const [params, func] = FUNCTIONS[request.method];
  const extra = Object.keys(kwargs).filter((k) => !params.slice(args.length).includes(k));
  if (args.length > params.length || extra.length) {
    return error('TypeError', `${request.method}() got unexpected arguments`);
  }
  try {
    const positional = [...args, ...params.slice(args.length).map((n) => kwargs[n])];
    return { result: await func(...positional) };
  } catch (e) {
    const type = e instanceof ZeroDivisionError ? 'ZeroDivisionError' : e.constructor.name;
    return error(type, e.message, [e.message], `${type}: ${e.message}\n${e.stack}`);
  }
}

async function main(url, serverId) {
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  const exchange = `server_${serverId}_ex`;
  const queue = `server_${serverId}_queue`;
  await channel.assertExchange(exchange, 'direct', { durable: false, autoDelete: true });
  await channel.assertQueue(queue, { durable: true, autoDelete: true, exclusive: false });
  await channel.bindQueue(queue, exchange, serverId);
  await channel.prefetch(1);
  // Replies go out on a confirm channel of their own: a reply to an exchange
  // that is gone (404) or may not be written (403) closes only that channel;
  // the reply is dropped and the next one gets a new channel.
  let replies = null;
  const replyChannel = () => {
    if (replies === null) {
      const opened = connection.createConfirmChannel().then((ch) => {
        ch.on('error', (e) => console.error(`reply channel closed: ${e.message}`));
        ch.on('close', () => { if (replies === opened) replies = null; });
        return ch;
      });
      replies = opened;
    }
    return replies;
  };
  const reply = async (replyTo, body, correlationId) => {
    const ch = await replyChannel();
    await new Promise((resolve) => {
      const dropped = (e) => {
        console.error(`reply to ${replyTo} dropped: ${e.message}`);
        resolve();
      };
      try {
        ch.publish(...replyDestination(replyTo), Buffer.from(JSON.stringify(body)),
          { correlationId, contentType: 'application/json' },
          (err) => (err ? dropped(err) : resolve()));
      } catch (e) {
        dropped(e);
      }
    });
  };
  const { consumerTag } = await channel.consume(queue, async (msg) => {
    const answer = await handle(msg);
    const replyTo = msg.properties.replyTo;
    if (answer !== null && replyTo) {
      await reply(replyTo, answer, msg.properties.correlationId);
    }
    channel.ack(msg);
  });
  process.on('SIGTERM', async () => {
    await channel.cancel(consumerTag);
    await channel.close();
    await connection.close();
    process.exit(0);
  });
  console.log('ready');
}

main(process.argv[2], process.argv[3]).catch((err) => {
  console.error(err);
  process.exit(1);
});
