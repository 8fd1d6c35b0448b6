-- An agent's float and commission accounts are owned by the agent's id, not its name.
--
-- Reconciliation (float_ledger/reconciliation.py) finds an agent's commission accounts by the
-- owner_ref of its float. Agents were created with owner_ref 'agent:<name>', and two agents may
-- share a name: reconciling one counted the other's commission too. gateway/registry.py now
-- creates them as 'agent:<agent_id>'; this renames the accounts of the agents there already.
-- owner_ref is not part of any transfer's hash, and accounts keep their ids.
UPDATE ledger_accounts l
   SET owner_ref = 'agent:' || a.agent_id
  FROM agents a
 WHERE l.id IN (a.float_account_id, a.commission_account_id)
   AND l.owner_ref IS DISTINCT FROM 'agent:' || a.agent_id;
