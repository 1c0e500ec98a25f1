// Every error this package throws on purpose. Each class has a stable `name` that callers
// may switch on, read-only context, and the underlying `cause` when there is one. The
// package is pure, so nothing here is retryable: every error means "the input is wrong".

export type SdlErrorContext = Readonly<Record<string, string | number | boolean | undefined>>;

/** One problem found in a spec or an SDL, `path` in dotted form (`groups[1].gpu.model`). */
export interface SdlIssue {
  readonly path: string;
  readonly message: string;
}

export abstract class SdlPackageError extends Error {
  abstract override readonly name: string;
  readonly context: SdlErrorContext;

  constructor(message: string, context: SdlErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.context = Object.freeze({ ...context });
  }
}

/** A GPU model string matches no catalog slug or alias; `suggestion` is the closest slug. */
export class UnknownGpuModelError extends SdlPackageError {
  override readonly name = 'UnknownGpuModelError';
  readonly input: string;
  readonly suggestion: string | undefined;

  constructor(input: string, suggestion: string | undefined, path = 'gpu.model') {
    const hint = suggestion === undefined ? '' : `; did you mean "${suggestion}"?`;
    super(`${path}: unknown GPU model "${input}"${hint}`, { input, suggestion, path });
    this.input = input;
    this.suggestion = suggestion;
  }
}

/** Issues carried by the errors below, joined into the message one per line. */
function describeIssues(summary: string, issues: readonly SdlIssue[]): string {
  return [summary, ...issues.map((issue) => `  ${issue.path || '(root)'}: ${issue.message}`)].join('\n');
}

/** A cluster-spec group (`akash.groups[]`) does not validate. */
export class GroupSpecError extends SdlPackageError {
  override readonly name = 'GroupSpecError';
  readonly issues: readonly SdlIssue[];

  constructor(issues: readonly SdlIssue[], context: SdlErrorContext = {}, options?: { cause?: unknown }) {
    super(describeIssues('invalid akash group spec:', issues), { ...context, issueCount: issues.length }, options);
    this.issues = Object.freeze([...issues]);
  }
}

/** An SDL document (generated or hand-written) does not validate. */
export class SdlValidationError extends SdlPackageError {
  override readonly name = 'SdlValidationError';
  readonly issues: readonly SdlIssue[];

  constructor(issues: readonly SdlIssue[], context: SdlErrorContext = {}, options?: { cause?: unknown }) {
    super(describeIssues('invalid SDL:', issues), { ...context, issueCount: issues.length }, options);
    this.issues = Object.freeze([...issues]);
  }
}

/**
 * @akashnetwork/chain-sdk refused an SDL that our own validation accepted. Our rules should
 * be a superset of chain-sdk's, so this points at a gap in ours; `issues` are chain-sdk's.
 */
export class ChainSdkRejectedError extends SdlPackageError {
  override readonly name = 'ChainSdkRejectedError';
  readonly issues: readonly SdlIssue[];

  constructor(issues: readonly SdlIssue[], context: SdlErrorContext = {}) {
    super(describeIssues('@akashnetwork/chain-sdk rejected the SDL:', issues), { ...context, issueCount: issues.length });
    this.issues = Object.freeze([...issues]);
  }
}

/** A split or reshape of a group was asked for that cannot be done (e.g. 3 parts of 2 nodes). */
export class FragmentationError extends SdlPackageError {
  override readonly name = 'FragmentationError';
}
