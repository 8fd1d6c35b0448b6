-- A token meter is registered once, whichever of its numbers names it.
--
-- STS names one meter by its 11-digit meter number (or 13-digit), or by its 18-digit PAN, the
-- issuer number and the meter number with a check digit (protocol/sts.py meter_pan). The decoder
-- key is derived from the PAN, so both spellings are one meter. Registered under both, the meter
-- had two rows, each with its own last TID: two payments in one minute, one under each number,
-- got the same TID, and the meter refused the second token as used. The UNIQUE (meter_number,
-- token_id) of tokens saw two meters. Now an STS meter's PAN is unique among STS meters.
--
-- vendgate_sts_pan() is meter_pan() in SQL, for numbers that registry.add_meter has checked (both
-- check digits): NULL for any other length. Its check digit is the Luhn digit of
-- protocol/sts.py luhn_check_digit(); a test compares the two.
CREATE FUNCTION vendgate_luhn_check_digit(digits text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT (10 - sum(CASE WHEN t.pos % 2 = 1 THEN (CASE WHEN t.d * 2 > 9 THEN t.d * 2 - 9 ELSE t.d * 2 END)
                      ELSE t.d END) % 10)::integer % 10
  FROM unnest(string_to_array(reverse(digits), NULL)::integer[]) WITH ORDINALITY AS t(d, pos)
$$;

-- (An index expression runs with search_path pg_catalog, pg_temp during CREATE INDEX and VACUUM:
-- the function keeps the schema it was made in.)
CREATE FUNCTION vendgate_sts_pan(meter_number text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path FROM CURRENT AS $$
SELECT CASE length(meter_number)
           WHEN 11 THEN '600727' || meter_number || vendgate_luhn_check_digit('600727' || meter_number)
           WHEN 13 THEN '0000' || meter_number || vendgate_luhn_check_digit('0000' || meter_number)
           WHEN 18 THEN meter_number
       END
$$;

-- A database holding one meter twice stops here, naming them: keep the row the meter's tokens
-- were issued under, move the other's customer link to it, then migrate again.
DO $$
DECLARE
    twice text;
BEGIN
    SELECT string_agg(numbers, '; ') INTO twice
      FROM (SELECT string_agg(meter_number, ' and ' ORDER BY meter_number) AS numbers
              FROM meters WHERE supply_mode = 'sts'
             GROUP BY vendgate_sts_pan(meter_number) HAVING count(*) > 1) d;
    IF twice IS NOT NULL THEN
        RAISE EXCEPTION 'token meters registered twice under one STS PAN: %', twice;
    END IF;
END;
$$;

CREATE UNIQUE INDEX meters_sts_pan ON meters (vendgate_sts_pan(meter_number)) WHERE supply_mode = 'sts';
