// kafkajs against a ringlog broker, for tests/kafka_clients.rs.
//
// Usage: node kafkajs_roundtrip.js BOOTSTRAP TOPIC COUNT
// Expects TOPIC to exist and be empty. A producer sends COUNT keyed records with headers (acks
// all); a consumer in a fresh group reads the topic from the beginning, commits after every batch
// and, once it holds exactly the COUNT records, disconnects (leaving the group). Then checks: every
// record arrived once with its key, value and headers; the group's committed offsets equal the
// log ends; the group is Empty. Prints `ok <what>` lines; exits 1 with `FAIL <what>` otherwise.

'use strict'

const { Kafka, logLevel, Partitioners } = require('kafkajs')

const [bootstrap, topic, countArg] = process.argv.slice(2)
const count = Number(countArg)
const groupId = `${topic}-group`
const DEADLINE_MS = 40000

function fail (what) {
  console.log(`FAIL ${what}`)
  process.exit(1)
}

async function main () {
  const kafka = new Kafka({
    clientId: 'ringlog-kafkajs',
    brokers: [bootstrap],
    logLevel: logLevel.WARN,
    retry: { retries: 8, initialRetryTime: 100 }
  })

  const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner })
  await producer.connect()
  const sent = new Map()
  for (let start = 0; start < count; start += 100) {
    const messages = []
    for (let i = start; i < Math.min(count, start + 100); i++) {
      const message = { key: `key-${i % 31}`, value: `js-${i}`, headers: { n: `${i}` } }
      sent.set(message.value, message)
      messages.push(message)
    }
    await producer.send({ topic, acks: -1, messages })
  }
  await producer.disconnect()
  console.log(`ok produced ${count}`)

  const admin = kafka.admin()
  await admin.connect()
  const ends = new Map((await admin.fetchTopicOffsets(topic)).map(p => [p.partition, p.high]))
  const total = [...ends.values()].reduce((sum, high) => sum + Number(high), 0)
  if (total !== count) fail(`log ends ${JSON.stringify([...ends])} hold ${total} records, not ${count}`)

  const consumer = kafka.consumer({ groupId, sessionTimeout: 6000, heartbeatInterval: 500 })
  await consumer.connect()
  await consumer.subscribe({ topics: [topic], fromBeginning: true })
  const received = []
  let done
  const allReceived = new Promise(resolve => { done = resolve })
  await consumer.run({
    autoCommit: false,
    eachBatch: async ({ batch }) => {
      for (const m of batch.messages) {
        received.push({ partition: batch.partition, offset: m.offset, message: m })
      }
      if (batch.messages.length > 0) {
        const next = (BigInt(batch.lastOffset()) + 1n).toString()
        await consumer.commitOffsets([{ topic, partition: batch.partition, offset: next }])
      }
      if (received.length >= count) done()
    }
  })
  const timer = setTimeout(() => fail(`consumed ${received.length} of ${count} in ${DEADLINE_MS} ms`), DEADLINE_MS)
  await allReceived
  clearTimeout(timer)
  await consumer.disconnect()
  console.log('ok consumer disconnected')

  const positions = new Set(received.map(r => `${r.partition}/${r.offset}`))
  if (positions.size !== received.length) fail(`${received.length - positions.size} records delivered twice`)
  if (received.length !== count) fail(`consumed ${received.length} records, produced ${count}`)
  for (const { partition, offset, message } of received) {
    const want = sent.get(message.value.toString())
    if (!want) fail(`unexpected record ${message.value} at ${partition}/${offset}`)
    const key = message.key && message.key.toString()
    const n = message.headers.n && message.headers.n.toString()
    if (key !== want.key || n !== want.headers.n) {
      fail(`record ${want.value}: key ${key} headers n=${n}, want key ${want.key} n=${want.headers.n}`)
    }
    sent.delete(want.value)
  }
  if (sent.size !== 0) fail(`${sent.size} records never consumed`)
  console.log(`ok consumed exactly the ${count} records`)

  const committed = (await admin.fetchOffsets({ groupId, topics: [topic] }))[0].partitions
  for (const { partition, offset } of committed) {
    // A partition that got no records has nothing to commit: Kafka reports -1 for it.
    const want = ends.get(partition) === '0' ? '-1' : ends.get(partition)
    if (offset !== want) fail(`partition ${partition}: committed ${offset}, want ${want} (the log end)`)
  }
  if (committed.length !== ends.size) fail(`committed offsets for ${committed.length} of ${ends.size} partitions`)
  console.log('ok committed offsets are the log ends')

  const { groups } = await admin.describeGroups([groupId])
  if (groups.length !== 1 || groups[0].state !== 'Empty' || groups[0].members.length !== 0) {
    fail(`group after disconnect: ${JSON.stringify(groups)}`)
  }
  console.log('ok the group is Empty after the consumer left')
  await admin.disconnect()
  console.log('all checks passed')
}

main().catch(e => {
  console.log(`FAIL ${e.stack || e}`)
  process.exit(1)
})
