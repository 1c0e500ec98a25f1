import { describe, expect, it } from 'vitest';
import { SecretString } from './config.js';
import { isSecretFieldName, REDACTED, redactFields, redactText, redactValue, registerSecretValue } from './logger.js';

describe('log redaction', () => {
  it('redacts an exact list of secret field names, in any case or separator style', () => {
    for (const name of ['joinToken', 'join_token', 'ADMIN-TOKEN', 'sessionToken', 'secretAccessKey', 'accessKeyId', 'mnemonic', 'password', 'x-drover-session-token']) {
      expect(isSecretFieldName(name), name).toBe(true);
    }
    // Object keys, upload ids and the names of the variables that hold keys are not secrets.
    for (const name of ['key', 'keys', 'objectKey', 'uploadId', 'accessKeyIdEnv', 'secretAccessKeyEnv', 'keepLast', 'monkey']) {
      expect(isSecretFieldName(name), name).toBe(false);
    }
  });

  it('keeps object keys and redacts nested secrets', () => {
    const out = redactFields({
      key: 'runs/r1/ckpt/000040/rank-0/model.pt',
      keys: ['runs/r1/ckpt/000040/rank-0/optim.pt'],
      storage: { store: { bucket: 'ckpts', credentials: { accessKeyId: 'AKIAEXAMPLE', secretAccessKey: 'wJalrXUtnFEMI' } } },
      nodes: [{ name: 'n1', joinToken: 'tok-abcdefgh' }],
    });
    expect(out['key']).toBe('runs/r1/ckpt/000040/rank-0/model.pt');
    expect(out['keys']).toEqual(['runs/r1/ckpt/000040/rank-0/optim.pt']);
    expect(out['storage']).toEqual({ store: { bucket: 'ckpts', credentials: REDACTED } });
    expect(out['nodes']).toEqual([{ name: 'n1', joinToken: REDACTED }]);
  });

  it("redacts the bridge's per-job key and TLS private key wherever a StartJob is logged", () => {
    const out = redactFields({ startJob: { jobId: 'j-a1', bridgeSecret: 'bridge-key-0123456789', bridgeTls: { certificatePem: 'CERT', privateKeyPem: 'PRIVATE', caPem: 'CA' } } });
    expect(out['startJob']).toEqual({ jobId: 'j-a1', bridgeSecret: REDACTED, bridgeTls: { certificatePem: 'CERT', privateKeyPem: REDACTED, caPem: 'CA' } });
  });

  it('replaces values known to be secret wherever they appear, SecretString values included', () => {
    registerSecretValue('registered-token-0123456789');
    const s3Key = new SecretString('s3-secret-value-xyz');
    expect(s3Key.reveal()).toBe('s3-secret-value-xyz');
    const line = redactText('head refused registered-token-0123456789 while signing with s3-secret-value-xyz');
    expect(line).toBe(`head refused ${REDACTED} while signing with ${REDACTED}`);
    const out = redactFields({
      error: new Error('bad token registered-token-0123456789'),
      detail: { note: 'key s3-secret-value-xyz' },
    });
    expect(JSON.stringify(out)).not.toContain('registered-token-0123456789');
    expect(JSON.stringify(out)).not.toContain('s3-secret-value-xyz');
    expect(out['error']).toEqual({ name: 'Error', message: `bad token ${REDACTED}` });
  });

  it('does not take short values, which would garble every line', () => {
    registerSecretValue('abc');
    expect(redactText('abc abc')).toBe('abc abc');
  });

  it('replaces values nested deeper than it walks', () => {
    let deep: Record<string, unknown> = { leaf: 'x' };
    for (let i = 0; i < 20; i++) deep = { next: deep };
    expect(JSON.stringify(redactValue(deep))).toContain(REDACTED);
  });
});
