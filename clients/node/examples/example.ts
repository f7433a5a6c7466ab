/**
 * A tour of the client: catalogue, events, recommendations, an error.
 *
 *     make serve                                   # in another shell
 *     cd clients/node && npm ci --ignore-scripts && npm run example  # HALFLIFE_ADDRESS=host:port to point elsewhere
 */
import { Code, ConnectError, HalflifeClient, Strategy, fieldViolations } from "../src/index.js";

const address = process.env.HALFLIFE_ADDRESS ?? "127.0.0.1:50051";
const client = new HalflifeClient(address);

try {
  const info = await client.modelInfo();
  console.log(`model ${info.modelId}: ${info.dimension}-d on ${info.executionProvider}`);

  const [query] = await client.embed(["lightweight tent for backpacking"]);
  console.log(`embedding: ${query.length} floats, first ${query[0].toFixed(4)}`);

  await client.upsertItems([
    { id: "ex-tent", text: "Two-person ultralight backpacking tent", categories: ["camping"] },
    { id: "ex-stove", text: "Compact camping stove", categories: ["camping"] },
    { id: "ex-novel", text: "A detective novel set in 1920s London", categories: ["books"] },
  ]);

  const now = Date.now();
  await client.recordEvents([
    { eventId: "ex-1", userId: "ex-user", type: "view", itemId: "ex-tent", eventTime: new Date(now - 3_600_000) },
    { eventId: "ex-2", userId: "ex-user", type: "purchase", itemId: "ex-tent", eventTime: new Date(now - 60_000) },
  ]);

  const recs = await client.recommend("ex-user", { limit: 2 });
  console.log(`recommended (${Strategy[recs.strategy]}):`, recs.items.map((i) => `${i.itemId} ${i.score.toFixed(3)}`));

  try {
    await client.recordEvents([{ eventId: "ex-3", userId: "ex-user", type: "click" }]);
  } catch (error) {
    const e = ConnectError.from(error);
    console.log(`rejected with ${Code[e.code]}:`, fieldViolations(e));
  }
} finally {
  client.close();
}
