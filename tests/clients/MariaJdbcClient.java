// MariaDB Connector/J against sluice, for the end-to-end tests: text-protocol queries, server-side
// prepared statements (with useServerPrepStmts=true: COM_STMT_PREPARE/EXECUTE, binary rows), a
// transaction rolled back and one committed, a multi-statement (allowMultiQueries=true) with
// its several results, and a blob over 16 MiB inserted and read back. Prints one line per
// check, "name=value", the same whether it runs directly or through sluice.
//
// usage: java -cp /usr/share/java/mariadb-java-client.jar MariaJdbcClient.java JDBC_URL
import java.math.BigDecimal;
import java.security.MessageDigest;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.Statement;
import java.sql.Timestamp;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HexFormat;
import java.util.List;

public class MariaJdbcClient {
    static final int BLOB_BYTES = 17 * 1024 * 1024 + 3;

    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0])) {
            try (Statement s = c.createStatement()) {
                s.execute("drop table if exists j_t");
                s.execute("create table j_t (id int primary key, name varchar(40), "
                    + "price decimal(10, 2), seen datetime(3), b longblob)");
            }
            try (PreparedStatement p = c.prepareStatement(
                    "insert into j_t (id, name, price, seen) values (?, ?, ?, ?)")) {
                for (int i = 1; i <= 3; i++) {
                    p.setInt(1, i);
                    p.setString(2, i == 3 ? "ünïcödé 'quoted' \\ back" : "row" + i);
                    p.setBigDecimal(3, i == 2 ? null : new BigDecimal(i + ".25"));
                    p.setTimestamp(4, i == 2 ? null : Timestamp.valueOf("2024-01-0" + i + " 03:04:05.678"));
                    p.executeUpdate();
                }
            }
            try (Statement s = c.createStatement()) {
                System.out.println("text_rows=" + rows(s.executeQuery(
                    "select id, name, price, seen from j_t order by id")));
            }
            try (PreparedStatement p = c.prepareStatement(
                    "select id, name, price, seen from j_t where id >= ? order by id")) {
                for (int low : new int[] {2, 3}) {
                    p.setInt(1, low);
                    System.out.println("prepared_rows_" + low + "=" + rows(p.executeQuery()));
                }
            }

            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.execute("insert into j_t (id, name) values (10, 'rolled back')");
                c.rollback();
                s.execute("insert into j_t (id, name) values (11, 'committed')");
                c.commit();
            }
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                System.out.println("after_transactions=" + rows(s.executeQuery(
                    "select id from j_t where id >= 10")));
            }

            try (Statement s = c.createStatement()) {
                List<String> results = new ArrayList<>();
                boolean isRows = s.execute("select count(*) from j_t; "
                    + "update j_t set name = 'first' where id = 1; "
                    + "select id, name from j_t where id <= 2 order by id");
                while (true) {
                    if (isRows) {
                        results.add(rows(s.getResultSet()));
                    } else if (s.getUpdateCount() != -1) {
                        results.add("affected " + s.getUpdateCount());
                    } else {
                        break;
                    }
                    isRows = s.getMoreResults();
                }
                System.out.println("multi=" + results);
            }

            byte[] blob = blob();
            try (PreparedStatement p = c.prepareStatement(
                    "insert into j_t (id, name, b) values (?, ?, ?)")) {
                p.setInt(1, 100);
                p.setString(2, "blob");
                p.setBytes(3, blob);
                p.executeUpdate();
            }
            try (PreparedStatement p = c.prepareStatement(
                    "select b, length(b), sha2(b, 256) from j_t where id = ?")) {
                p.setInt(1, 100);
                ResultSet r = p.executeQuery();
                r.next();
                String sha = HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(blob));
                System.out.println("blob_length=" + r.getLong(2));
                System.out.println("blob_equal=" + Arrays.equals(r.getBytes(1), blob));
                System.out.println("blob_server_sha256_matches=" + sha.equals(r.getString(3)));
            }
        }
    }

    /** Every row of `r`, each column as the driver's string form, with the column names. */
    static String rows(ResultSet r) throws Exception {
        ResultSetMetaData m = r.getMetaData();
        List<String> out = new ArrayList<>();
        List<String> names = new ArrayList<>();
        for (int i = 1; i <= m.getColumnCount(); i++) {
            names.add(m.getColumnLabel(i) + ":" + m.getColumnTypeName(i));
        }
        out.add(names.toString());
        while (r.next()) {
            List<String> row = new ArrayList<>();
            for (int i = 1; i <= m.getColumnCount(); i++) {
                row.add(r.getString(i));
            }
            out.add(row.toString());
        }
        return out.toString();
    }

    /** BLOB_BYTES of every byte value, reproducibly. */
    static byte[] blob() throws Exception {
        byte[] b = new byte[BLOB_BYTES];
        MessageDigest sha = MessageDigest.getInstance("SHA-256");
        for (int i = 0, n = 0; i < b.length; n++) {
            byte[] d = sha.digest(new byte[] {(byte) n, (byte) (n >> 8), (byte) (n >> 16), (byte) (n >> 24)});
            int k = Math.min(d.length, b.length - i);
            System.arraycopy(d, 0, b, i, k);
            i += k;
        }
        return b;
    }
}
