-- client_encoding set later in the session is applied to every backend that serves it, and
-- reported (psql follows the ParameterStatus): results arrive converted, and characters the
-- client's encoding lacks fail as they do directly. The session's statements run on whichever
-- backend is free, so each statement below may meet a backend that has not seen the SET yet.
SHOW client_encoding;
SET client_encoding TO 'EUC_JP';
SHOW client_encoding;
SELECT chr(26085) || chr(26412) AS nihon;
SELECT chr(26085) AS again, length(chr(26085)) AS len;
BEGIN;
SELECT chr(12354) AS hiragana_a;
COMMIT;
SET client_encoding TO 'LATIN1';
SELECT chr(233) AS e_acute;
SELECT chr(26085) AS not_in_latin1;
SELECT 1 AS still_fine;
SET client_encoding = 'SJIS';
SELECT chr(26085) AS sjis;
RESET client_encoding;
SHOW client_encoding;
SELECT chr(233) AS utf8_again;
