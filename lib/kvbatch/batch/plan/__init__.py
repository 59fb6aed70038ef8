"""What the server will hold and why: the memory of serving beside the KV cache (memory), the plan and its record
in plan.json (plan, plan_record), each server's budget (budgets), the short-lived probe server that tokenizes and
weighs the model (probe), each endpoint's plan (server_plans) and the whole preparation before a run (prepare)."""
