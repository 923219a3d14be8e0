// The npm `sqs-consumer` library as its README shows it, one Consumer per queue.
// Arguments: --endpoint URL --queues-file FILE [--wait-s 20] [--batch]
// Environment: BENCH_IDS_FILE, BENCH_HANDLER_MS (as for the Python consumers).
// Default: handleMessage per message (the library deletes each with DeleteMessage);
// --batch: handleMessageBatch (one DeleteMessageBatch per received batch).
import fs from "node:fs";
import { SQSClient } from "@aws-sdk/client-sqs";
import { Consumer } from "sqs-consumer";

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 ? args[index + 1] : fallback;
};
const endpoint = option("--endpoint");
const queueUrls = JSON.parse(fs.readFileSync(option("--queues-file"), "utf8"));
const waitS = Number(option("--wait-s", "20"));
const isBatch = args.includes("--batch");
const sleepMs = Number(process.env.BENCH_HANDLER_MS || "0");
const fd = fs.openSync(process.env.BENCH_IDS_FILE, "a");

const record = (message) => {
  fs.writeSync(fd, `${message.MessageId} ${(Date.now() / 1000).toFixed(6)}\n`);
};
const pause = () => (sleepMs ? new Promise((resolve) => setTimeout(resolve, sleepMs)) : null);

const sqs = new SQSClient({ region: "us-east-1", endpoint });
const consumers = queueUrls.map((queueUrl) =>
  Consumer.create({
    queueUrl,
    sqs,
    batchSize: 10,
    waitTimeSeconds: waitS,
    ...(isBatch
      ? {
          handleMessageBatch: async (messages) => {
            messages.forEach(record);
            await pause();
            return messages;
          },
        }
      : {
          handleMessage: async (message) => {
            record(message);
            await pause();
            return message;
          },
        }),
  }),
);
for (const consumer of consumers) {
  consumer.on("error", (err) => console.error(`error: ${err.message}`));
  consumer.start();
}
const stop = () => {
  for (const consumer of consumers) consumer.stop();
  setTimeout(() => process.exit(0), 200);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
