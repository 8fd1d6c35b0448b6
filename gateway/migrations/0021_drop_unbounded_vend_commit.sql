-- Drops the 53-argument vend_commit_topups() of 0012, kept by 0015 for gateways of the release
-- before it. That form never got the check of 0019: a gateway still calling it could recover a
-- debt that another gateway had paid down since its read, taking the customer's debt account
-- above zero. A gateway that old now fails its commit (nothing is written, each request gets an
-- error reply and may be sent again) instead of taking a customer's money twice.
DO $$
DECLARE
    old_form regprocedure;
BEGIN
    FOR old_form IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.proname = 'vend_commit_topups' AND p.pronargs = 53
           AND p.pronamespace = current_schema()::regnamespace
    LOOP
        EXECUTE format('DROP FUNCTION %s', old_form);
    END LOOP;
END
$$;
