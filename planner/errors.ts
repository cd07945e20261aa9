/** Why a pipeline cannot run. Found before anything runs; names the step at fault. */
export class PlanError extends Error {
  override readonly name = 'PlanError';
  constructor(
    readonly code:
      | 'ERR_PLAN_NOT_A_PIPELINE'
      | 'ERR_PLAN_BAD_NAME'
      | 'ERR_PLAN_DUPLICATE_STEP'
      | 'ERR_PLAN_NOT_A_FUNCTION'
      | 'ERR_PLAN_UNKNOWN_INPUT'
      | 'ERR_PLAN_BAD_INPUT'
      | 'ERR_PLAN_CYCLE'
      | 'ERR_PLAN_EMPTY',
    message: string,
    readonly step?: string,
  ) {
    super(message);
  }
}
