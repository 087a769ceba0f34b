// kafkajs through leader changes, for tests/kafka_cluster_clients.rs: records a history for
// scripts/checker/kafka_history.py (its docstring has the format).
//
// Usage: node kafkajs_history.js BOOTSTRAP(comma-separated) TOPIC HISTORY [RATE]
// An idempotent producer (acks all, one request in flight) sends unique values `js-<n>`, 20 a
// request to one partition, the partitions in turn, about RATE a second (default 400); a consumer group member
// reads TOPIC from the beginning and commits each batch after recording it. Events: send, ack
// (partition and offset from the produce answer's base offset), fail (a send that threw: its
// values may or may not be written), assign (GROUP_JOIN), poll, commit / commit_unknown, reset
// (kafkajs logs "Offset out of range, resetting"), error (other client errors).
//
// KAFKAJS_DEBUG=1 logs kafkajs's debug lines (not its Connection ones) to stderr.
//
// On SIGTERM the producer stops and disconnects; the consumer reads on until it has read every
// acknowledged value (at most 30 s), then leaves the group and the process exits 0. Exit 1 when
// the consumer could not read them all in time or a client call failed for good.

'use strict'

const fs = require('fs')
const { Kafka, logLevel } = require('kafkajs')

const [bootstrap, topic, historyPath, rateArg] = process.argv.slice(2)
const rate = Number(rateArg || 400)
const groupId = `${topic}-kafkajs`
const history = fs.openSync(historyPath, 'a')

function record (type, fields) {
  const line = JSON.stringify({ type, process: fields.process || 'kafkajs-consumer', time: Date.now() / 1000, ...fields })
  fs.writeSync(history, line + '\n')
}

// kafkajs's own log lines: resets become reset events, errors error events, all go to stderr.
const logCreator = () => ({ namespace, level, log }) => {
  const { message, ...extra } = log
  const text = `${namespace}: ${message} ${JSON.stringify(extra)}`
  if (/resetting to default offset/i.test(message)) {
    record('reset', { partition: extra.partition, detail: text })
  } else if (level === logLevel.ERROR) {
    record('error', { process: 'kafkajs', detail: text })
  }
  if (level <= logLevel.WARN || (process.env.KAFKAJS_DEBUG && !/^Connection/.test(namespace))) console.error(new Date().toISOString(), text)
}

const kafka = new Kafka({
  clientId: 'ringlog-kafkajs-history',
  brokers: bootstrap.split(','),
  logLevel: process.env.KAFKAJS_DEBUG ? logLevel.DEBUG : logLevel.INFO,
  logCreator,
  retry: { retries: 30, initialRetryTime: 100, maxRetryTime: 1000 }
})

let stopping = false
process.on('SIGTERM', () => { stopping = true })

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function produce (partitions) {
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 })
  await producer.connect()
  const acked = new Set()
  let n = 0
  const started = Date.now()
  while (!stopping) {
    const due = Math.floor((Date.now() - started) / 1000 * rate)
    if (n + 20 > due) {
      await sleep(10)
      continue
    }
    // One partition a request: kafkajs 2.2.4 loses writes when one send() spans partitions led
    // by different brokers and a partition's leader moves to a broker that already answered
    // that send. Its retry (src/producer/sendMessages.js) resends only to brokers without an
    // answer, so the moved partition's records are never resent, the send resolves without
    // them, and their sequence numbers are reused by the next send: the broker, as Kafka does,
    // refuses a different count at a used sequence (OUT_OF_ORDER_SEQUENCE_NUMBER) and answers
    // an equal count as a retry of the written batch, with its offsets. The history checker
    // found it (lost writes, offsets acknowledged to two values); docs/replication.md.
    const partition = (n / 20) % partitions
    const messages = []
    for (let i = 0; i < 20; i++, n++) {
      const value = `js-${n}`
      messages.push({ value, partition })
      record('send', { process: 'kafkajs-producer', value })
    }
    try {
      const answers = await producer.send({ topic, acks: -1, timeout: 10000, messages })
      const answer = answers.find(a => a.partition === partition && a.errorCode === 0)
      if (!answer) throw new Error(`no answer for partition ${partition}: ${JSON.stringify(answers)}`)
      messages.forEach((m, k) => {
        const offset = Number(BigInt(answer.baseOffset) + BigInt(k))
        record('ack', { process: 'kafkajs-producer', value: m.value, partition, offset })
        acked.add(m.value)
      })
    } catch (e) {
      for (const m of messages) record('fail', { process: 'kafkajs-producer', value: m.value, error: String(e) })
    }
  }
  await producer.disconnect()
  return acked
}

async function main () {
  const admin = kafka.admin()
  await admin.connect()
  const metadata = await admin.fetchTopicMetadata({ topics: [topic] })
  const partitions = metadata.topics[0].partitions.length
  await admin.disconnect()

  const read = new Set()
  // A small retry budget, and a restart after any crash. kafkajs retries a commit answered
  // NOT_COORDINATOR at the broker it has (its OffsetManager looks the coordinator up again only
  // once that connection closes), so when the old coordinator comes back at its address the
  // commit fails there until the retries run out. And a fetch answered NOT_LEADER makes it
  // rejoin the group at once, while a commit of the batch in hand is still retried with the
  // old generation: ILLEGAL_GENERATION until the retries run out, which kafkajs counts as not
  // retriable and would stop the consumer for good. Both are kafkajs's; the broker answers as
  // Kafka does. A restarted consumer rejoins and resumes at the group's committed offsets.
  const consumer = kafka.consumer({
    groupId,
    sessionTimeout: 6000,
    heartbeatInterval: 500,
    retry: { retries: 5, initialRetryTime: 100, maxRetryTime: 1000, restartOnFailure: async () => true }
  })
  consumer.on(consumer.events.GROUP_JOIN, ({ payload }) => {
    record('assign', { group: groupId, partitions: (payload.memberAssignment[topic] || []).slice().sort() })
  })
  let crashed = null
  consumer.on(consumer.events.CRASH, ({ payload }) => {
    record('error', { detail: `consumer crashed: ${payload.error} (restart: ${payload.restart})` })
    if (!payload.restart) crashed = payload.error
  })
  await consumer.connect()
  await consumer.subscribe({ topics: [topic], fromBeginning: true })
  await consumer.run({
    autoCommit: false,
    eachBatch: async ({ batch }) => {
      if (batch.messages.length === 0) return
      const records = batch.messages.map(m => [batch.partition, Number(m.offset), m.value.toString()])
      record('poll', { records })
      for (const r of records) read.add(r[2])
      const next = (BigInt(batch.lastOffset()) + 1n).toString()
      const commit = { group: groupId, partition: batch.partition, offset: Number(next) }
      // A failed commit is recorded and not thrown: kafkajs answers a throwing eachBatch by
      // fetching the partitions of that fetch again from their committed offsets, a rewind
      // with no new assignment the history could show. The group catches up at its next
      // rejoin, which starts from the committed offsets (an assign event).
      try {
        await consumer.commitOffsets([{ topic, partition: batch.partition, offset: next }])
        record('commit', commit)
      } catch (e) {
        record('commit_unknown', commit)
        record('error', { detail: `commit: ${e}` })
      }
    }
  })

  const acked = await produce(partitions)
  const deadline = Date.now() + 30000
  while ([...acked].some(v => !read.has(v))) {
    if (crashed) throw crashed
    if (Date.now() > deadline) {
      const missing = [...acked].filter(v => !read.has(v))
      console.log(`FAIL the consumer did not read ${missing.length} acknowledged values in 30 s, e.g. ${missing.slice(0, 5)}`)
      process.exit(1)
    }
    await sleep(50)
  }
  // Bounded: kafkajs's disconnect can wait for ever when it lands while the fetchers are being
  // rebuilt after a metadata change (seen when the killed node came back), and a consumer it
  // restarted after a crash can leave connections that keep node alive. The history is whole.
  const left = await Promise.race([consumer.disconnect().then(() => true), sleep(10000).then(() => false)])
  console.log(`ok acknowledged ${acked.size}, read ${read.size}${left ? '' : ' (disconnect timed out)'}`)
  process.exit(0)
}

main().catch(e => {
  console.log(`FAIL ${e.stack || e}`)
  process.exit(1)
})
