import { describe, expect, it } from "vitest";
import { TrainerSupervisor } from "./trainer-supervisor.js";

const extra = { ckptDir: "/state/jobs/j/ckpt", agentSocket: "/state/agent.sock", pythonPath: "/opt/drover/worker/python" };

describe("the trainer environment", () => {
  it("counts restarts like torchrun and lets the user's variables through, but not over the contract", () => {
    const env = TrainerSupervisor.jobEnvironment({
      jobId: "job-1-a3", runId: "run-1", attempt: 3, maxRestarts: 5, worldSize: 4, localWorldSize: 2, rankOffset: 2, group: "local",
      env: { PYTHONPATH: "/mine", WORLD_SIZE: "999", OMP_NUM_THREADS: "4" },
    }, extra);
    expect(env).toMatchObject({
      TORCHELASTIC_RESTART_COUNT: "2", TORCHELASTIC_MAX_RESTARTS: "5", TORCHELASTIC_RUN_ID: "run-1",
      ROLE_NAME: "default", ROLE_WORLD_SIZE: "4", WORLD_SIZE: "4", PYTHONPATH: "/mine:/opt/drover/worker/python",
      // The user's own OMP_NUM_THREADS wins over torchrun's default of 1.
      OMP_NUM_THREADS: "4",
    });
    expect(env).not.toHaveProperty("TORCHELASTIC_USE_AGENT_STORE");
    expect(env).not.toHaveProperty("DROVER_JOIN_TOKEN");
  });

  it("sets OMP_NUM_THREADS=1 only when several ranks share the node and nobody set it", () => {
    const saved = process.env.OMP_NUM_THREADS;
    delete process.env.OMP_NUM_THREADS;
    try {
      expect(TrainerSupervisor.jobEnvironment({ worldSize: 2, localWorldSize: 2 }, extra).OMP_NUM_THREADS).toBe("1");
      expect(TrainerSupervisor.jobEnvironment({ worldSize: 2, localWorldSize: 1 }, extra).OMP_NUM_THREADS).toBeUndefined();
    } finally {
      if (saved !== undefined) process.env.OMP_NUM_THREADS = saved;
    }
  });
});
