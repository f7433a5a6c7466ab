/**
 * Starts a real Halflife server on 127.0.0.1 for the tests: the repository's
 * `.venv/bin/halflife serve --port 0` (or $HALFLIFE_BIN) with a temporary
 * data directory and the model in $HALFLIFE_TEST_MODEL_DIR; the port is read
 * from its "serving on 127.0.0.1:PORT" log line; stop() sends SIGTERM.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// dist/test/server.js -> the repository root is four levels up.
const REPO = resolve(fileURLToPath(import.meta.url), "../../../../..");
const START_TIMEOUT_MS = 120_000;

export interface LiveServer {
  address: string;
  stop(): Promise<void>;
}

export async function startServer(): Promise<LiveServer> {
  const bin = process.env.HALFLIFE_BIN ?? join(REPO, ".venv/bin/halflife");
  const modelDir = process.env.HALFLIFE_TEST_MODEL_DIR
    ? resolve(REPO, process.env.HALFLIFE_TEST_MODEL_DIR)
    : join(REPO, "var/models/all-MiniLM-L6-v2");
  if (!existsSync(bin)) throw new Error(`no halflife executable at ${bin}: run 'make install' (or set HALFLIFE_BIN)`);
  if (!existsSync(join(modelDir, "manifest.json"))) {
    throw new Error(`no exported model in ${modelDir}: run 'make model' or set HALFLIFE_TEST_MODEL_DIR`);
  }
  const dataDir = mkdtempSync(join(tmpdir(), "halflife-node-test-"));
  const child: ChildProcess = spawn(
    bin,
    ["serve", "--host", "127.0.0.1", "--port", "0", "--model-dir", modelDir, "--data-dir", dataDir],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let log = "";
  const exited = new Promise<number | null>((done) => child.once("exit", (code) => done(code)));
  const address = await new Promise<string>((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`server did not start in ${START_TIMEOUT_MS} ms:\n${log}`)), START_TIMEOUT_MS);
    const onData = (chunk: Buffer) => {
      log += chunk.toString();
      const found = /serving on (127\.0\.0\.1:\d+)/.exec(log);
      if (found) {
        clearTimeout(timer);
        done(found[1]);
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", onData);
    void exited.then((code) => {
      clearTimeout(timer);
      fail(new Error(`server exited with ${code} before serving:\n${log}`));
    });
  });
  return {
    address,
    async stop() {
      if (child.exitCode === null) child.kill("SIGTERM");
      const code = await exited;
      rmSync(dataDir, { recursive: true, force: true });
      if (code !== 0) throw new Error(`server exited with ${code} after SIGTERM:\n${log}`);
    },
  };
}
