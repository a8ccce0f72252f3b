"""COM_CHANGE_USER through sluice, for the end-to-end tests: logs in as USER, prepares a
statement, changes to NEW_USER with mysql-connector-python's cmd_change_user, then shows who it
is now and that the prepared statement is gone (the server reset the session). Prints one line
per step, `name=value`; a refused change prints `change=ERR <errno> <message>` and stops.

usage: mysql_change_user.py PORT USER PASSWORD NEW_USER NEW_PASSWORD TLS(0|1)
"""
import sys

import mysql.connector

port, user, password, new_user, new_password, tls = sys.argv[1:7]
options = dict(host="127.0.0.1", port=int(port), user=user, password=password,
               database="shop", use_pure=True, connection_timeout=20)
if tls == "1":
    options.update(ssl_disabled=False, ssl_verify_cert=False)
else:
    options.update(ssl_disabled=True)
cnx = mysql.connector.connect(**options)
cur = cnx.cursor()
cur.execute("select current_user()")
print(f"before={cur.fetchone()[0]}")
cur.execute("prepare st from 'select 1'")
cur.close()
try:
    cnx.cmd_change_user(username=new_user, password=new_password, database="shop")
except mysql.connector.Error as e:
    print(f"change=ERR {e.errno} {e.msg}")
    sys.exit(0)
print("change=ok")
cur = cnx.cursor()
cur.execute("select current_user(), count(*) from t")
who, rows = cur.fetchone()
print(f"after={who} rows={rows}")
try:
    cur.execute("execute st")
    cur.fetchall()
    print("prepared=kept")
except mysql.connector.Error as e:
    print(f"prepared=gone {e.errno}")
cnx.close()
